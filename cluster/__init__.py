"""mtacluster, a mail transfer agent run as a cluster of small Python processes (ARCHITECTURE.md).

Importing the package first puts in place the guard that keeps a stale mypyc build from shadowing edited
sources (cluster/compiled.py); it must stay the first import here.
"""

from cluster import compiled as compiled
