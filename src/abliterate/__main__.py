from abliterate.cli import main

raise SystemExit(main())
