from minivit.cli import main

raise SystemExit(main())
