"The no-sync guard moved to `nntrain.testing` (06_testing); this name stays for imports written before the move."
from nntrain.testing import HOST_READS as READS, no_host_sync_in_batches

__all__ = ['READS', 'no_host_sync_in_batches']
