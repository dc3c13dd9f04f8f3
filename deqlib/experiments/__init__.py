"""Experiment drivers: config + run + evaluation of one experiment each, called by notebooks."""
