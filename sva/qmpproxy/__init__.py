"""The host-side QMP allow-list proxy.

The appliance VM must be able to pause a guest, dump its registers and find its RAM file,
and nothing more: a compromised appliance must not be able to reset, migrate, reconfigure
or write into the guests it watches. The proxy sits between the appliance and each guest's
QMP socket, forwards only the commands sva issues (`policy.DEFAULT_POLICY`) and answers
everything else itself with a QMP error. See `sva qmp-proxy --help` and docs/admin.md.
"""

from sva.qmpproxy.policy import AllowList, Verdict
from sva.qmpproxy.server import DirectoryProxy, Limits, UnixProxy, serve_stdio

__all__ = ["AllowList", "DirectoryProxy", "Limits", "UnixProxy", "Verdict", "serve_stdio"]
