from kdn_hf.blend import KDNSelection, CacheBlendSelection
import sels

CONFIGS = {
    "kdn@0.15": (lambda: KDNSelection(), 0.15),
    "cacheblend@0.064": (lambda: CacheBlendSelection(), 0.064),
    "kdn-flat@0.10": (lambda: KDNSelection(narrow_depths=()), 0.10),
    "kdn-flat@0.15": (lambda: KDNSelection(narrow_depths=()), 0.15),
    "kdn-mean@0.15": (lambda: KDNSelection(query_tokens="mean"), 0.15),
    "kdn-flat@1.0": (lambda: KDNSelection(narrow_depths=()), 1.0),
}
CONFIGS.update(sels.CONFIGS)
CONFIGS["kdn-flat@0.5"] = (lambda: KDNSelection(narrow_depths=()), 0.5)
