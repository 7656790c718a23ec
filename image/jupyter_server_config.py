# Jupyter settings baked into the datalab image. The proxy is the only way in, so Jupyter's own
# token and password are off; the proxy keeps the public Host header, so remote access is allowed.
c = get_config()  # noqa: F821
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = 8888
c.ServerApp.open_browser = False
c.ServerApp.allow_remote_access = True
c.ServerApp.root_dir = "/home/datalab/work"
c.ServerApp.password = ""
c.IdentityProvider.token = ""
c.ServerApp.disable_check_xsrf = False
c.ServerApp.allow_origin = ""
c.KernelManager.autorestart = True
