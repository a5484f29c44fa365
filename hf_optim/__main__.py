from hf_optim.cli import main; import sys; sys.exit(main())
