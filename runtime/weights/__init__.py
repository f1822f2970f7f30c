"""How new weights travel from the learner to the rollout workers: config, bucket layout, wire format, transports."""
