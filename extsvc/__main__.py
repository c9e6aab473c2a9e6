from extsvc.cli import main

raise SystemExit(main())
