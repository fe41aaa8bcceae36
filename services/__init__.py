"""p2pgrid: a peer-to-peer electricity market for neighbourhoods and smart-city districts."""
