"""The playground: a page at ``/playground`` that runs a query on this server's model and shows it
decoding, and the ``POST /v1/queries`` events endpoint it uses (queries.py)."""
