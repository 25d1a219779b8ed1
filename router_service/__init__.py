"""router_service: the front door at an edge site; decides edge or cloud per request."""
