from tensafe.cli import main

raise SystemExit(main())
