# cdinn-stream simulation profile: `ipython --profile-dir=profiles/cdinn_sim` (needs pip install '.[profile]').
# Only imports and one factory call; settings come from the environment (profiles/README.md and the
# README, "IPython profile").
from cdinn_stream.apps.profile import setup_simulated_beamline

beamline = setup_simulated_beamline()
RE, bcdi, peak_x, strain, cdinn = beamline.RE, beamline.detector, beamline.peak, beamline.strain, beamline.callback
