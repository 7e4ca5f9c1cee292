"""Economics: prices, cost attribution and the ledger. It knows nothing of HTTP or engines."""
