"""The MR weighting matcher on real series descriptions and acquisition parameters.

Every row is a series as a scanner writes it: its description, the MR Image module attributes
(PS3.3 C.8.3.1) and the weighting an MR physicist gives it (or None: passed over). Each row
says where its name and parameters come from. Sources:

- [corpus]: the headers of ../shared/dicom-corpus (read with dcmdump; brain-mr-sag-anon,
  transfer-syntaxes-mr-dcm_qa_ts, enhanced-mr-dcm_qa_enh).
- [flair0]: github.com/open-dicom/siemens_flair_0 README (a Siemens Prisma header dump).
- [nih]: github.com/neurolabusc/dcm_qa_nih In/*/README-Series.txt (dcm2niix's Siemens/GE QA).
- [gefmrif]: github.com/nih-fmrif/ge_test_dataset 20180907-26974/mr_0004/README-Series.txt.
- [toshiba]: github.com/neurolabusc/dcm_qa_toshiba Ref/10006_DTI_ALL_20d.json (dcm2niix).
- [spine]: github.com/hjleepapa/multimodal-agents-lab detailed_image_descriptions.md
  (a Siemens Prisma T2 TSE BIDS sidecar).
- [chbh]: github.com/chbh-opensource/chbh-on-bear docs/mri/hardware/scanner.md (MPRAGE).
- [zagreb]: github.com/HIIM-PERINEDO/zagreb_dhcp bids/README.md: the series a Siemens Prisma
  writes for one heudiconv protocol (names; parameters: [btip]).
- [ppmi]: PPMI heudiconv heuristics (T1W_SERIES names; parameters: [btip]).
- [bidscoin]: bidscoin/dcm2bids templates' SeriesDescription criteria for Philips 3D series
  ("*T1W_3D*", "*3D_FLAIR*", "*3D T1GD*"; GE ScanOptions "EDR_GEMS\\PROMO_GEMS\\ACC_GEMS\\
  IR_GEMS" for 3D T1; parameters: [btip]).
- [issue]: the series names reported in issue 14 from a real study ("sT2/TSE/T",
  "T2W/FE-EPI", "FLAIR_ROI") and the vendor protocol names it lists (GE "Ax T2 FRFSE", "Sag
  CUBE FLAIR", "Ax T1 BRAVO +C", Philips "T2W_TSE", "3D_FLAIR", "T1W_3D_TFE +C", Canon
  "FLAIR_3D"); parameters: [btip].
- [btip]: typical product values inside the ranges of the consensus Brain Tumor Imaging
  Protocol (Ellingson et al., Neuro-Oncology 2015;17(9):1188-1198): 3D IR-GRE T1 (MPRAGE TI
  ~900-1100 ms, GE IR-SPGR/BRAVO TI ~400-450 ms, Philips TFE TR ~8 ms), 2D T2 TSE/FSE (TR
  >2500, TE 80-120 ms), 2D/3D FLAIR (TR >6000, TE 100-140, TI 2000-2500 ms), DWI EPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.facts import describe_series
from dicom_node.mr_sequence import classify
from tests.support.cases import mr_series

pytestmark = pytest.mark.unit

CORPUS_FILES = {
    "mprage": "brain-mr-sag-anon",
    "philips-b0": "enhanced-mr-dcm_qa_enh/In/Philips/IM_0027_fMAP.dcm",
    "siemens-xa-epi": "enhanced-mr-dcm_qa_enh/In/Siemens/XA10/6_1.dcm",
    "ts-epi": "transfer-syntaxes-mr-dcm_qa_ts/In/1.dcm",
}


@dataclass(frozen=True)
class Row:
    description: str
    expected: str | None  # T1, T1c, T2, FLAIR; None when the series must be passed over
    attributes: dict[str, Any]
    pixels: str = "image"  # "image", or "binary" for a mask stored as MR


def row(description: str, expected: str | None, pixels: str = "image", **attributes) -> Row:
    return Row(description, expected, attributes, pixels)


SE, IR, GR, EP = "SE", "IR", "GR", "EP"
ORIGINAL = ["ORIGINAL", "PRIMARY", "M", "ND"]

TABLE = [
    # --- Siemens ---------------------------------------------------------------------------
    # [corpus] brain-mr-sag-anon: the real MPRAGE header (Skyra/Verio 3 T).
    row("SAG MPRAGE 220 FOV", "T1", ScanningSequence=[GR, IR], SequenceVariant=["SK", "SP", "MP"],
        ScanOptions="IR", SequenceName="*tfl3d1_16ns", MRAcquisitionType="3D",
        RepetitionTime=2000, EchoTime=2.52, InversionTime=900, FlipAngle=9,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]),
    # [corpus] transfer-syntaxes-mr-dcm_qa_ts/In/1.dcm: a Siemens EPI mosaic.
    row("ax_asc_35sl", None, ScanningSequence=EP, SequenceVariant="SK", ScanOptions="FS",
        SequenceName="*epfid2d1_64", MRAcquisitionType="2D", RepetitionTime=3000, EchoTime=30,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]),
    # [flair0] Siemens Prisma E11 FLAIR.
    row("t2_tirm_tra_dark-fluid_FLAIR", "FLAIR", ScanningSequence=[SE, IR],
        SequenceVariant=["SK", "SP", "MP"], ScanOptions=["IR", "FS"], SequenceName="*tir2d1_16",
        MRAcquisitionType="2D", RepetitionTime=8000, EchoTime=81, InversionTime=2370,
        EchoTrainLength=16, FlipAngle=150),
    # [nih] 20180918Si/mr_0003: EPI on a Skyra.
    row("EPI PE=AP", None, ScanningSequence=EP, SequenceVariant="SK", ScanOptions="FS",
        SequenceName="epfid2d1_72", MRAcquisitionType="2D", RepetitionTime=2435.37, EchoTime=50,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "ECHO_00", "MOSAIC"]),
    # [spine] Siemens Prisma T2 TSE (TE 0.104 s, TR 3.5 s in the BIDS sidecar).
    row("I_t2_tse_sag_384_C1-C8_COMP_SP_1", "T2", ScanningSequence=SE,
        SequenceVariant=["SK", "SP", "OSP"], SequenceName="*tseR2d1rr19", MRAcquisitionType="2D",
        RepetitionTime=3500, EchoTime=104, FlipAngle=160),
    # [chbh] Siemens Prisma MPRAGE: TR 2000, TE 2.03, TI 880, flip 8.
    row("t1_mprage_sag_p2_iso", "T1", ScanningSequence=[GR, IR],
        SequenceVariant=["SK", "SP", "MP"], ScanOptions="IR", SequenceName="*tfl3d1_16ns",
        MRAcquisitionType="3D", RepetitionTime=2000, EchoTime=2.03, InversionTime=880,
        FlipAngle=8),
    # [chbh] timing, given post-contrast (Contrast/Bolus Agent set by the technologist).
    row("t1_mprage_sag_p2_iso", "T1c", ScanningSequence=[GR, IR],
        SequenceVariant=["SK", "SP", "MP"], ScanOptions="IR", SequenceName="*tfl3d1_16ns",
        MRAcquisitionType="3D", RepetitionTime=2000, EchoTime=2.03, InversionTime=880,
        FlipAngle=8, ContrastBolusAgent="Gadovist"),
    # [zagreb] names; [btip] parameters.
    row("t1_mprage_sag_iso", "T1", ScanningSequence=[GR, IR], SequenceVariant=["SK", "SP", "MP"],
        SequenceName="*tfl3d1_16ns", MRAcquisitionType="3D", RepetitionTime=2300,
        EchoTime=2.98, InversionTime=900),
    row("t2_space_sag_iso_edinburgh", "T2", ScanningSequence=SE, SequenceVariant=["SK", "SP"],
        SequenceName="*spc_314ns", MRAcquisitionType="3D", RepetitionTime=3200, EchoTime=409),
    row("t2_tse_tra_1mm_MCRIB_p2", "T2", ScanningSequence=SE, SequenceVariant=["SK", "SP"],
        SequenceName="*tse2d1_15", MRAcquisitionType="2D", RepetitionTime=6000, EchoTime=98),
    row("t2_tse_tra", "T2", ScanningSequence=SE, SequenceVariant=["SK", "SP", "OSP"],
        SequenceName="*tse2d1_18", MRAcquisitionType="2D", RepetitionTime=5000, EchoTime=95),
    row("t2_space_dark-fluid_sag_iso", "FLAIR", ScanningSequence=[SE, IR],
        SequenceVariant=["SK", "SP", "MP"], SequenceName="*spcir_278ns", MRAcquisitionType="3D",
        RepetitionTime=5000, EchoTime=388, InversionTime=1800),
    row("SWI_Images", None, ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        SequenceName="*swi3d1r", MRAcquisitionType="3D", RepetitionTime=28, EchoTime=20,
        ImageType=["ORIGINAL", "PRIMARY", "SWI", "ND", "NORM"]),
    row("Mag_Images", None, ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        SequenceName="*swi3d1r", MRAcquisitionType="3D", RepetitionTime=28, EchoTime=20),
    row("Pha_Images", None, ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        SequenceName="*swi3d1r", MRAcquisitionType="3D", RepetitionTime=28, EchoTime=20,
        ImageType=["ORIGINAL", "PRIMARY", "P", "ND"]),
    row("mIP_Images(SW)", None, ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="3D", RepetitionTime=28, EchoTime=20,
        ImageType=["DERIVED", "PRIMARY", "MNIP", "ND"]),
    row("AAHead_Scout_64ch-head-coil", None, ScanningSequence=GR, SequenceVariant="SP",
        SequenceName="*fl3d1_ns", MRAcquisitionType="3D", RepetitionTime=3.15, EchoTime=1.37,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]),
    row("AAHead_Scout_64ch-head-coil_MPR_sag", None, ScanningSequence=GR, SequenceVariant="SP",
        MRAcquisitionType="3D", RepetitionTime=3.15, EchoTime=1.37,
        ImageType=["DERIVED", "PRIMARY", "MPR", "ND", "NORM"]),
    row("localizer", None, ScanningSequence=GR, SequenceVariant="SP", SequenceName="*fl2d1",
        MRAcquisitionType="2D", RepetitionTime=8.6, EchoTime=4, ImageType=ORIGINAL),
    row("SpinEchoFieldMap_AP", None, ScanningSequence=EP, SequenceVariant=["SK", "SS"],
        SequenceName="epse2d1_90", MRAcquisitionType="2D", RepetitionTime=8000, EchoTime=66),
    row("rfMRI_REST_PA_SBRef", None, ScanningSequence=EP, SequenceVariant=["SK", "SS"],
        SequenceName="epfid2d1_90", MRAcquisitionType="2D", RepetitionTime=800, EchoTime=37),
    row("dMRI_dir106_AP_2x2x2_ADC", None, ScanningSequence=EP, SequenceVariant=["SK", "SP"],
        SequenceName="ep_b0_1500", MRAcquisitionType="2D", RepetitionTime=3230, EchoTime=89,
        ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"]),
    row("dMRI_dir106_AP_2x2x2_FA", None, ScanningSequence=EP, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="2D", RepetitionTime=3230, EchoTime=89,
        ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "FA", "ND"]),
    row("ep2d_diff_4scan_trace_p2_TRACEW", None, ScanningSequence=EP, SequenceVariant=["SK", "SP"],
        SequenceName="*ep_b1000t", MRAcquisitionType="2D", RepetitionTime=5300, EchoTime=84,
        ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]),
    # [ppmi] Siemens T1 names; [btip] parameters (1.5 T MPRAGE TI 1100 ms).
    row("MPRAGE GRAPPA2", "T1", ScanningSequence=[GR, IR], SequenceVariant=["SK", "SP", "MP"],
        SequenceName="*tfl3d1_16ns", MRAcquisitionType="3D", RepetitionTime=2300, EchoTime=2.98,
        InversionTime=900),
    row("SAG T1 3D MPRAGE", "T1", ScanningSequence=[GR, IR], SequenceVariant=["SK", "SP", "MP"],
        MRAcquisitionType="3D", RepetitionTime=2400, EchoTime=3.08, InversionTime=1100),
    row("sag mprage", "T1", ScanningSequence=[GR, IR], SequenceVariant=["SK", "SP", "MP"],
        MRAcquisitionType="3D", RepetitionTime=1900, EchoTime=2.26, InversionTime=900),
    # [btip] Siemens clinical names: spin-echo T1 before and after gadolinium, FLASH, TOF.
    row("t1_se_tra", "T1", ScanningSequence=SE, SequenceVariant=["SP", "OSP"],
        SequenceName="*se2d1", MRAcquisitionType="2D", RepetitionTime=550, EchoTime=8.9),
    row("t1_se_tra_KM", "T1c", ScanningSequence=SE, SequenceVariant=["SP", "OSP"],
        SequenceName="*se2d1", MRAcquisitionType="2D", RepetitionTime=550, EchoTime=8.9),
    row("t1_mprage_tra_p2_iso_post", "T1c", ScanningSequence=[GR, IR],
        SequenceVariant=["SK", "SP", "MP"], MRAcquisitionType="3D", RepetitionTime=2300,
        EchoTime=2.32, InversionTime=900),
    row("t1_vibe_fs_tra_post", "T1c", ScanningSequence=GR, SequenceVariant=["SP", "OSP"],
        SequenceName="*fl3d1", MRAcquisitionType="3D", RepetitionTime=6.5, EchoTime=2.4,
        FlipAngle=12),
    row("tof_fl3d_tra_p2_multi-slab", None, ScanningSequence=GR, SequenceVariant=["SP", "OSP"],
        SequenceName="*fl3d3r_t70", MRAcquisitionType="3D", RepetitionTime=21, EchoTime=3.4,
        AngioFlag="Y"),
    row("t2_fl2d_tra_hemo", None, ScanningSequence=GR, SequenceVariant="SP",
        SequenceName="*fl2d1", MRAcquisitionType="2D", RepetitionTime=650, EchoTime=19.9),
    row("ep2d_perf", None, ScanningSequence=EP, SequenceVariant=["SK", "SP"],
        SequenceName="*epfid2d1_128", MRAcquisitionType="2D", RepetitionTime=1500, EchoTime=30,
        ImageType=["ORIGINAL", "PRIMARY", "PERFUSION", "NONE", "MOSAIC"]),
    row("t2_tse_tra_pd", None, ScanningSequence=SE, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="2D", RepetitionTime=3000, EchoTime=12),
    row("t2_tirm_tra_STIR", None, ScanningSequence=[SE, IR], SequenceVariant=["SK", "SP", "MP"],
        MRAcquisitionType="2D", RepetitionTime=4000, EchoTime=60, InversionTime=160),
    # --- GE ---------------------------------------------------------------------------------
    # [nih] 20180918GE/mr_0007: GE EPI fMRI (Discovery MR750).
    row("Axial EPI-FMRI (Sequential S to I)", None, ScanningSequence=[EP, GR], SequenceVariant="SS",
        ScanOptions=["EPI_GEMS", "PFF"], MRAcquisitionType="2D", RepetitionTime=5000,
        EchoTime=30, ImageType=["ORIGINAL", "PRIMARY", "EPI", "NONE"]),
    # [gefmrif] GE diffusion: TE 85 and TR 7800 would pass for a T2, but it is EP.
    row("Axial 4 directions, 3 shells, pepolar=1", None, ScanningSequence=[EP, SE],
        SequenceVariant="NONE", ScanOptions=["SAT_GEMS", "EPI_GEMS", "FILTERED_GEMS", "PFF", "FS"],
        MRAcquisitionType="2D", RepetitionTime=7800, EchoTime=85.1,
        ImageType=["ORIGINAL", "PRIMARY", "OTHER"]),
    # [issue] GE names; [btip] parameters; [bidscoin] IR_GEMS on the 3D T1.
    row("Ax T2 FRFSE", "T2", ScanningSequence=SE, SequenceVariant=["SK", "OSP"],
        ScanOptions=["FAST_GEMS", "FR_GEMS"], MRAcquisitionType="2D", RepetitionTime=5000,
        EchoTime=102, ImageType=["ORIGINAL", "PRIMARY", "OTHER"]),
    row("Sag CUBE FLAIR", "FLAIR", ScanningSequence=[SE, IR], SequenceVariant=["SK", "MP"],
        ScanOptions=["FAST_GEMS", "EDR_GEMS", "IR_GEMS"], MRAcquisitionType="3D",
        RepetitionTime=6000, EchoTime=130, InversionTime=1800),
    row("Ax T1 BRAVO +C", "T1c", ScanningSequence=GR, SequenceVariant=["SS", "SK"],
        ScanOptions=["EDR_GEMS", "PROMO_GEMS", "ACC_GEMS", "IR_GEMS"], MRAcquisitionType="3D",
        RepetitionTime=8.2, EchoTime=3.2, InversionTime=450, FlipAngle=12),
    row("Sag T1 BRAVO", "T1", ScanningSequence=GR, SequenceVariant=["SS", "SK"],
        ScanOptions=["EDR_GEMS", "PROMO_GEMS", "ACC_GEMS", "IR_GEMS"], MRAcquisitionType="3D",
        RepetitionTime=8.2, EchoTime=3.2, InversionTime=450, FlipAngle=12),
    row("Ax T2 FLAIR", "FLAIR", ScanningSequence=[SE, IR], SequenceVariant=["SK", "SP", "MP"],
        ScanOptions=["FAST_GEMS", "IR_GEMS"], MRAcquisitionType="2D", RepetitionTime=9000,
        EchoTime=140, InversionTime=2250),
    row("Ax T1 FLAIR", "T1", ScanningSequence=[SE, IR], SequenceVariant=["SK", "SP", "MP"],
        ScanOptions=["FAST_GEMS", "IR_GEMS"], MRAcquisitionType="2D", RepetitionTime=2200,
        EchoTime=9, InversionTime=860),
    row("Ax T1 SE +C", "T1c", ScanningSequence=SE, SequenceVariant="NONE", MRAcquisitionType="2D",
        RepetitionTime=600, EchoTime=12),
    row("Sag T1 FSPGR 3D", "T1", ScanningSequence=GR, SequenceVariant=["SS", "SP", "SK"],
        MRAcquisitionType="3D", RepetitionTime=8.5, EchoTime=3.4, FlipAngle=12),
    row("Ax T2* GRE", None, ScanningSequence=GR, SequenceVariant="SP", MRAcquisitionType="2D",
        RepetitionTime=650, EchoTime=20),
    row("Ax SWAN", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="3D",
        RepetitionTime=40, EchoTime=4.2, ImageType=["ORIGINAL", "PRIMARY", "OTHER"]),
    row("Ax DWI 1000b", None, ScanningSequence=[EP, SE], SequenceVariant="NONE",
        MRAcquisitionType="2D", RepetitionTime=6000, EchoTime=72, DiffusionBValue=1000),
    row("3-Plane Loc", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="2D",
        RepetitionTime=5.2, EchoTime=1.5, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
    row("ASSET Cal", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="3D",
        RepetitionTime=150, EchoTime=1.5),
    row("Ax 3D TOF", None, ScanningSequence=GR, SequenceVariant="SP", MRAcquisitionType="3D",
        RepetitionTime=23, EchoTime=3.4, AngioFlag="Y"),
    row("Ax T2 PROPELLER", "T2", ScanningSequence=SE, SequenceVariant=["SK", "OSP"],
        MRAcquisitionType="2D", RepetitionTime=6500, EchoTime=110),
    # --- Philips -----------------------------------------------------------------------------
    # [corpus] enhanced-mr-dcm_qa_enh Philips "B0 NS" is read from the real file below; its
    # classic counterpart here: a field map, phase and magnitude in one series.
    row("B0 NS", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="3D",
        RepetitionTime=3.8, EchoTime=1.52, ImageType=["ORIGINAL", "PRIMARY", "B0", "MIXED"]),
    # [issue] the study that routed wrongly: a Philips-style T2 TSE, an EPI and a lesion mask.
    row("sT2/TSE/T", "T2", ScanningSequence=SE, SequenceVariant="SK", MRAcquisitionType="2D",
        RepetitionTime=3000, EchoTime=80, ImageType=["ORIGINAL", "PRIMARY", "T2", "SE"]),
    row("T2W/FE-EPI", None, ScanningSequence=[GR, EP], SequenceVariant="SK",
        MRAcquisitionType="2D", RepetitionTime=3000, EchoTime=35,
        ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]),
    row("FLAIR_ROI", None, "binary", ScanningSequence=[SE, IR], SequenceVariant="SK",
        MRAcquisitionType="2D", RepetitionTime=11000, EchoTime=125, InversionTime=2800),
    # [issue] Philips names; [btip] parameters; [bidscoin] "*T1W_3D*", "*3D_FLAIR*".
    row("T2W_TSE", "T2", ScanningSequence=SE, SequenceVariant="SK", MRAcquisitionType="2D",
        RepetitionTime=3000, EchoTime=80, ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]),
    row("3D_FLAIR", "FLAIR", ScanningSequence=[SE, IR], SequenceVariant="SK",
        MRAcquisitionType="3D", RepetitionTime=4800, EchoTime=310, InversionTime=1650,
        ImageType=["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"]),
    row("T1W_3D_TFE +C", "T1c", ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="3D", RepetitionTime=8.1, EchoTime=3.7, FlipAngle=8,
        ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]),
    row("T1W_3D_TFE", "T1", ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="3D", RepetitionTime=8.1, EchoTime=3.7, FlipAngle=8,
        ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]),
    row("3D T1GD", "T1c", ScanningSequence=GR, SequenceVariant=["SK", "SP"],
        MRAcquisitionType="3D", RepetitionTime=8.1, EchoTime=3.7),
    row("T1W_SE", "T1", ScanningSequence=SE, SequenceVariant="SK", MRAcquisitionType="2D",
        RepetitionTime=550, EchoTime=10),
    row("T2W_FLAIR", "FLAIR", ScanningSequence=[SE, IR], SequenceVariant="SK",
        MRAcquisitionType="2D", RepetitionTime=11000, EchoTime=125, InversionTime=2800),
    row("DWI_SENSE", None, ScanningSequence=[SE, EP], SequenceVariant="SK",
        MRAcquisitionType="2D", RepetitionTime=3000, EchoTime=75,
        ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "DWI"]),
    row("Survey", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="2D",
        RepetitionTime=11, EchoTime=4.6),
    row("SWIp", None, ScanningSequence=GR, SequenceVariant="SS", MRAcquisitionType="3D",
        RepetitionTime=31, EchoTime=7.2, ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]),
    row("T2W_TSE_PD", None, ScanningSequence=SE, SequenceVariant="SK", MRAcquisitionType="2D",
        RepetitionTime=3000, EchoTime=10, ImageType=["ORIGINAL", "PRIMARY", "P_SE", "P", "SE"]),
    # --- Canon (Toshiba) -------------------------------------------------------------------
    # [toshiba] Galan 3T DTI: Canon writes ScanningSequence "SE_EP", TR 10 s.
    row("DTI_ALL_20d", None, ScanningSequence="SE_EP", SequenceVariant="NONE", ScanOptions="PFP",
        SequenceName="SEEPI2D+0.7", MRAcquisitionType="2D", RepetitionTime=10000, EchoTime=79,
        ImageType=["ORIGINAL", "PRIMARY", "GDC"]),
    # [issue] Canon names; [btip] parameters.
    row("FLAIR_3D", "FLAIR", ScanningSequence=[SE, IR], SequenceVariant=["SK", "MP"],
        MRAcquisitionType="3D", RepetitionTime=6000, EchoTime=120, InversionTime=2000),
    row("T2W_FSE", "T2", ScanningSequence=SE, SequenceVariant="SK", MRAcquisitionType="2D",
        RepetitionTime=4500, EchoTime=105),
    row("T1W_SE", "T1", ScanningSequence=SE, SequenceVariant="NONE", MRAcquisitionType="2D",
        RepetitionTime=500, EchoTime=10),
    row("T1_3D_MPRAGE+C", "T1c", ScanningSequence=[GR, IR], SequenceVariant=["SP", "MP"],
        MRAcquisitionType="3D", RepetitionTime=2100, EchoTime=3, InversionTime=1000),
    row("T2*W_FE", None, ScanningSequence=GR, SequenceVariant="SP", MRAcquisitionType="2D",
        RepetitionTime=700, EchoTime=20),
    row("Locator", None, ScanningSequence=GR, SequenceVariant="SP", MRAcquisitionType="2D",
        RepetitionTime=6, EchoTime=2.2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
]  # fmt: skip


def test_the_table_is_large_and_covers_every_vendor_and_weighting() -> None:
    assert len(TABLE) >= 60
    for weighting in ("T1", "T1c", "T2", "FLAIR", None):
        assert sum(r.expected == weighting for r in TABLE) >= 6, weighting


def write_row(folder: Path, number: int, item: Row) -> Path:
    """One MR instance with the row's attributes; pixels an image, or a 0/1 mask."""
    (ds,) = mr_series("1.2.3", item.description, number, slices=1)
    for keyword, value in item.attributes.items():
        setattr(ds, keyword, value)
    if item.pixels == "binary":
        mask = np.zeros((ds.Rows, ds.Columns), np.uint16)
        mask[2:5, 3:6] = 1
        ds.PixelData = mask.tobytes()
    path = folder / f"{number:03d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("number", range(len(TABLE)), ids=[r.description for r in TABLE])
def test_real_series_get_the_weighting_a_physicist_gives(tmp_path: Path, number: int) -> None:
    item = TABLE[number]
    facts = describe_series([write_row(tmp_path, number, item)])
    found = classify(facts)
    assert found.weighting == item.expected, found
    assert found.reason  # every series kept or passed over says why


@pytest.mark.parametrize(
    ("name", "expected", "reason"),
    [
        ("mprage", "T1", "TI 900"),
        ("philips-b0", None, "mixed images"),
        ("siemens-xa-epi", None, "echo-planar"),
        ("ts-epi", None, "echo-planar"),
    ],
)
def test_real_corpus_headers(corpus: Path, name: str, expected, reason: str) -> None:
    where = corpus / CORPUS_FILES[name]
    paths = sorted(where.glob("*.dcm")) if where.is_dir() else [where]
    found = classify(describe_series(paths))
    assert found.weighting == expected and reason in found.reason, found


def functional(ds: Dataset, sequence: str, **values: Any) -> None:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    setattr(ds.SharedFunctionalGroupsSequence[0], sequence, [item])


def test_enhanced_mr_is_weighted_from_its_functional_groups(corpus: Path, tmp_path: Path) -> None:
    """A real Philips enhanced MR file, its functional groups rewritten as a 3D FLAIR: TR in
    MR Timing and Related Parameters, TE in MR Echo, TI in MR Modifier (PS3.3 C.8.13.5)."""
    ds = dcmread(corpus / CORPUS_FILES["philips-b0"])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    ds.SeriesDescription = "3D_FLAIR"  # a Philips name; the timing decides
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "UNKNOWN"  # so that the timing, not this, decides
    ds.EchoPulseSequence = "SPIN"
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.MREchoSequence
        del frame.MRImageFrameTypeSequence
    functional(ds, "MRTimingAndRelatedParametersSequence", RepetitionTime=4800, FlipAngle=90)
    functional(ds, "MREchoSequence", EffectiveEchoTime=310.0)
    functional(ds, "MRModifierSequence", InversionRecovery="YES", InversionTimes=[1650.0])
    del ds.InversionTime
    ds.save_as(tmp_path / "flair.dcm")
    found = classify(describe_series([tmp_path / "flair.dcm"]))
    assert found.weighting == "FLAIR" and "TI 1650" in found.reason, found
    # The same file with contrast given (Contrast/Bolus Usage, PS3.3 C.7.6.16.2.12) and T1
    # timing is a T1c.
    functional(ds, "MRTimingAndRelatedParametersSequence", RepetitionTime=8.1, FlipAngle=8)
    functional(ds, "MREchoSequence", EffectiveEchoTime=3.7)
    functional(ds, "MRModifierSequence", InversionRecovery="NO")
    functional(ds, "ContrastBolusUsageSequence", ContrastBolusAgentNumber=1,
               ContrastBolusAgentAdministered="YES")  # fmt: skip
    ds.EchoPulseSequence = "GRADIENT"
    ds.SeriesDescription = "T1W_3D_TFE"
    ds.save_as(tmp_path / "t1c.dcm")
    found = classify(describe_series([tmp_path / "t1c.dcm"]))
    assert found.weighting == "T1c" and "Administered YES" in found.reason, found


MPRAGE = {"ScanningSequence": [GR, IR], "SequenceVariant": ["SK", "SP", "MP"],
          "MRAcquisitionType": "3D", "RepetitionTime": 2300, "EchoTime": 2.98,
          "InversionTime": 900}  # fmt: skip


@pytest.mark.parametrize(
    ("description", "agent", "expected"),
    [
        ("t1_mprage_sag_pre", "Gadovist", "T1"),  # pre-contrast wording wins over the agent
        ("t1_mprage_sag_prescan_norm", "Gadovist", "T1c"),  # "prescan" says nothing of contrast
        ("t1_mprage_sag_PC", None, "T1"),  # no agent, and "PC" is not taken for angiography
        ("T1 MPRAGE", "NONE", "T1"),  # an agent field saying none
    ],
)
def test_contrast_is_read_from_the_agent_and_words(
    tmp_path: Path, description: str, agent: str | None, expected: str
) -> None:
    attributes = dict(MPRAGE, **({"ContrastBolusAgent": agent} if agent else {}))
    facts = describe_series([write_row(tmp_path, 1, Row(description, expected, attributes))])
    assert classify(facts).weighting == expected, classify(facts)
