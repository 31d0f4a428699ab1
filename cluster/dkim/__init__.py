"""DKIM signing (RFC 6376, RFC 8463): canonicalization, keys, and the signer the frontend uses at acceptance."""
