"""Transports and connections: WebSocket, stdio, the HTTP endpoints beside them."""
