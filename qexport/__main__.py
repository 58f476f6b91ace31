from qexport.cli import main

raise SystemExit(main())
