/*
 * Test signature for the sva lab guest's "infected" scenario (sva.lab.scenarios.INFECTED).
 * The lab's init script assembles this string at run time from pieces, so it exists only in
 * the memory of the marker-holding process (its environment), never as a literal in the
 * initramfs: a hit proves the scanner read live process memory.
 */
rule SVA_Lab_Marker
{
    meta:
        description = "Marker string planted in process memory by the sva lab guest's infected scenario"
        author = "sva"
        mitre = "T1055"
        scenario = "lab infected"

    strings:
        $marker = "SVA-LAB-MARKER-8966aa98e54f8b26" ascii

    condition:
        $marker
}
