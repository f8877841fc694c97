"""What a model is and how it is loaded: its spec from configs (the driver), its modules (the workers), add-ons."""
