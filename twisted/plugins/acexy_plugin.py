# Scanned by every twistd run: keep it tiny and import nothing heavy.
# No __init__.py here or in twisted/ (STYLE.md pitfall 17).
from twisted.application.service import ServiceMaker

acexy = ServiceMaker(
    "acexy-tw",
    "acexy_tw.tap",
    "AceStream proxy: one engine session per content, many players, flow control",
    "acexy",
)
