import sys

from megatron_llm.plan.cli import main

sys.exit(main())
