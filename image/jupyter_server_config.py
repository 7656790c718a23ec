# Jupyter settings baked into the datalab image. The proxy is the only way in.
#
# The proxy proves itself with a per-instance secret in the X-Datalab-Auth header (the backend
# passes it in DATALAB_AUTH). Jupyter's own token would do the same job but would switch off its
# defences for every request the proxy forwards: a token-authenticated request skips the XSRF,
# Origin, Referer and CORS checks, so any web page could drive the notebook through a visitor's
# cookie. The identity provider below trusts the header without marking the request
# token-authenticated, so those checks stay on for what browsers send, and Jupyter has no token to
# put in its pages. Without the secret (a neighbour reaching the port directly) nothing is served.
# The proxy keeps the public Host header, so remote access is allowed.
import hmac
import os
import sys

from jupyter_server.auth.identity import IdentityProvider
from jupyter_server.auth.identity import User

# Read once and kept from kernels and terminals, which inherit the server's environment.
_SECRET = os.environ.pop("DATALAB_AUTH", "")
_HEADER = "X-Datalab-Auth"


class ProxyIdentityProvider(IdentityProvider):
    """The one user is whoever the proxy vouches for; there is no token, password or login cookie."""

    def get_user(self, handler):
        given = handler.request.headers.get(_HEADER, "")
        if _SECRET and hmac.compare_digest(given.encode(), _SECRET.encode()):
            return User(username="datalab", name="datalab", display_name="datalab")
        return None

    @property
    def auth_enabled(self):
        return True

    @property
    def login_available(self):
        return False

    @property
    def logout_available(self):
        return False


c = get_config()  # noqa: F821
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = 8888
c.ServerApp.open_browser = False
c.ServerApp.allow_remote_access = True
c.ServerApp.root_dir = "/home/datalab/work"
c.ServerApp.identity_provider_class = ProxyIdentityProvider
c.IdentityProvider.token = ""
c.PasswordIdentityProvider.hashed_password = ""
c.ServerApp.disable_check_xsrf = False
c.ServerApp.allow_origin = ""
c.ServerApp.allow_origin_pat = ""
c.ServerApp.allow_credentials = False
c.KernelManager.autorestart = True

# datalab's own API (datalab_work.py: the working directory as one archive, archives unpacked into
# it), beside this file: /etc/jupyter in the image, image/ in the repository (the process backend).
# traitlets runs a config file with __file__ set. Appended: nothing installed is shadowed.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)
c.ServerApp.jpserver_extensions.update({"datalab_work": True})  # merged with notebook's own

# What a datalab does not use, off so a boot costs less CPU (issue 19; measured with
# scripts/bench_start.py): the language-server extension looks for ~20 servers at every boot and
# none is installed; Lab's news and update checks would ask every new user about Jupyter's news feed
# and fetch it from the internet the instance cannot reach; the extension manager would build a PyPI
# client for installs the read-only root refuses anyway. Terminals stay (the culler reads
# /api/terminals).
c.ServerApp.jpserver_extensions.update({"jupyter_lsp": False})
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"

# The page's text (Lab's JavaScript, CSS, JSON) gzip-compressed for browsers that accept it, here
# in the instance: datalab_compression.py says what is left as it is (the user's files, streams).
c.ServerApp.jpserver_extensions.update({"datalab_compression": True})
