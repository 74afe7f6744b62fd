"""`python -m fcmae`: the same as the `fcmae` command."""

from fcmae.cli import main

raise SystemExit(main())
