import os
import sys

from lcsm.cli.main import main

if "TORCHELASTIC_RUN_ID" in os.environ:
    # a worker of torchrun: an uncaught exception is written where torchrun finds it, so that its
    # summary names the rank that failed first and its error (the root cause), not only the
    # ranks that then lost their peer
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
