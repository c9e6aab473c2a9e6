"""extsvc.admin.v1 (proto/extsvc/admin/v1/admin.proto): generated, do not edit."""
