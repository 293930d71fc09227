"""Runtime: what executes a placement on the device: the memory ledger, host and disk tiers,
transfers, the jitted steps, the schedules' scheduler and the run statistics and traces."""
