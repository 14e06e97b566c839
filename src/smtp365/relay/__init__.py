"""``smtp365 relay``: a store-and-forward SMTP relay in front of Exchange Online.

Modelled on Postfix: listener (smtpd) -> intake (cleanup) -> queue -> scheduler (qmgr) ->
workers (smtp) -> notify (bounce). All durable state lives in the queue
(:mod:`smtp365.relay.queue`); ``250`` is only said after the queue made a message durable.
"""
