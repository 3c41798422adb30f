"""What every TenSafe service shares: configuration, the server builder, auth, errors, telemetry, databases."""
