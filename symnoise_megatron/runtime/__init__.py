"""Where the job runs: process groups, and the CPU runtime used only without a GPU."""
