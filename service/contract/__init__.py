"""The repository contract: what export writes and the server reads; numpy and the standard library only."""
