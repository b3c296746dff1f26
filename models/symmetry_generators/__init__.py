"""Learning infinitesimal generators of continuous symmetries from data (Ko, Kim, Lee, NeurIPS 2024).

Data flow: ``kdv`` solves u_t + u u_x + u_xxx = 0 pseudo-spectrally (ETDRK4) -> ``validity`` flows the
solution graph's points (x, t, u) along a vector field by RK4 and scores the PDE residual of the moved
points (local least-squares derivatives) -> ``generators`` learns an MLP with one orthonormal head per
generator that minimises that score -> ``augmentation`` flows whole trajectories along known or learned
fields and resamples them onto the grid (LPSDA) -> ``fno`` trains a 1-D Fourier neural operator on them
and scores its rollout.
"""
