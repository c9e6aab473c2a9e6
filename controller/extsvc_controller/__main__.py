from __future__ import annotations

from extsvc_controller.cli import main

raise SystemExit(main())
