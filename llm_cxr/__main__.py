from llm_cxr.cli import main

raise SystemExit(main())
