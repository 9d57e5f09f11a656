from hpt_megatron.reward.cli import main

if __name__ == "__main__":  # worker processes import this module too; only the command line runs it
    main()
