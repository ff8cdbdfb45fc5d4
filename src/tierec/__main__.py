from tierec.cli import main

raise SystemExit(main())
