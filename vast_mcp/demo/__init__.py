"""The one-command demo: the simulated cloud, the server over stdio, and a real MCP client driving a tiny job."""
