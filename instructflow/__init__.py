"""instructflow's core: errors, the environment, params (config), the stage table, file readers and writers.

Everything may import the core; the core imports no other layer and changes nothing on import.
"""

__version__ = "0.1.0"
