# Jupyter settings baked into the datalab image. The proxy is the only way in: the password is off,
# and so is the token unless JUPYTER_TOKEN is set. The Docker backend sets a random one per
# instance and the proxy sends it with every request, so a neighbouring container that reaches this
# port directly is refused. The proxy keeps the public Host header, so remote access is allowed.
import os

c = get_config()  # noqa: F821
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = 8888
c.ServerApp.open_browser = False
c.ServerApp.allow_remote_access = True
c.ServerApp.root_dir = "/home/datalab/work"
c.ServerApp.password = ""
c.IdentityProvider.token = os.environ.get("JUPYTER_TOKEN", "")
c.ServerApp.disable_check_xsrf = False
c.ServerApp.allow_origin = ""
c.KernelManager.autorestart = True
