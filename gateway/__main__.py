"""`python -m gateway` is the same as the `mfa-gateway` command."""

from gateway.cli import main

raise SystemExit(main())
