"""`python -m warren.pipelines.report OUTPUT`: the same as `warren report OUTPUT`."""

from warren.pipelines.report.command import main

raise SystemExit(main())
