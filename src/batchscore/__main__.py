from batchscore.cli import main

raise SystemExit(main())
