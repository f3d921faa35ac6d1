"""Host-agnostic run machinery: checkpoint files and staging, the per-step guard (non-finite
losses, records that went bad), joint-loss logs, fault injection for the reliability tests."""
