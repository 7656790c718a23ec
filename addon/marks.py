"""Keys of the notes the addons leave each other in `flow.metadata` (plain values, so flows still save).

A flow is claimed by exactly one of: the api (HANDLED), or the router (ROUTED). FailClosed refuses
any flow that reaches it unclaimed.
"""

HANDLED = "datalab.api"  # a /datalab/* flow: the router leaves it alone
START = "datalab.start"  # the checked order (instances.Order, as a dict) of an upload whose body is on its way
STATIC = "datalab.static"  # a static fetch rerouted to an instance
PROGRESS = "datalab.progress"  # a start answered as an event stream: its channel's token (progress.py)
STREAMED = "datalab.streamed"  # that stream has begun: the start runs behind it, not in `response`
SINK = "datalab.sink"  # the body streams to the upload sink; the answer is given in `response`
DEFERRED = "datalab.deferred"  # a refusal (mitmproxy state), given in place of the sink's at-once answer
CUT = "datalab.cut"  # the body did not arrive within datalab_upload_timeout: answered 408, nothing started
ROUTED = "datalab.instance"  # the instance id a proxied flow was sent to
SESSION = "datalab.session"  # the session id of a proxied flow
UPSTREAM_TIMEOUT = "datalab.upstream_timeout"  # its instance gave no answer in time: the 504 is ours
WORK = "datalab.work"  # the work id whose archive this flow fetches (a live snapshot or the saved file)
# A routed WebSocket relayed as raw TCP (passthrough.py); on its TCP flow: the upgrade's flow id.
PASSTHROUGH = "datalab.passthrough"
