"""The web UI on the node's HTTP port: series, jobs, previews, the outbox, and the review gate.

``app`` builds the routes and middleware that ``node.service.http`` serves beside /metrics; ``auth`` holds
the logins (salted hashes from ``[web]``), sessions, CSRF tokens and the failed-login limit; ``views``
renders the pages (Jinja templates and a small stylesheet and script shipped in this package: no CDN, no
JavaScript build step) from the index's read-only queries, and calls the operator commands of
``node.spool.commands`` for the buttons.
"""
