from conntrack_agent.cli import main

raise SystemExit(main())
