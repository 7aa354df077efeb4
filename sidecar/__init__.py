"""The training sidecar: durable feedback store, sample selection, supervisor."""
