"""Self Forcing with peft + accelerate: adapters on one frozen base, the self-rollout, DMD and critic losses."""
