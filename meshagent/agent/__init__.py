"""The agent process (`meshagent run`): its lifetime, and the control path into the data path:
registration of inbounds in Consul with health probes, and following upstream endpoints."""
