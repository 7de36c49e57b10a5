"""`python -m broker ...` is the same as the `actor-broker` command."""

from broker.cli import main

raise SystemExit(main())
