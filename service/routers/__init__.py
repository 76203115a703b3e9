"""HTTP routers: /classify, /policies, and the operational endpoints."""
