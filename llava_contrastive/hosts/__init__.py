"""Host adapters: thin layers connecting the core to one VLM code base each."""
