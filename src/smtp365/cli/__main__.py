from smtp365.cli import main

raise SystemExit(main())
